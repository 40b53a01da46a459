-- One row per (Trackunit app, account) install. The client credentials are stored only as AES-256-GCM
-- ciphertext (nonce || ciphertext || tag) under the key named by `key_id`; the associated data binds each
-- ciphertext to this row's app, account and field, so a ciphertext copied to another row fails to decrypt.
create table installation (
    id uuid primary key default gen_random_uuid(),
    app_id text not null,
    account_id text not null,
    status text not null,
    -- Which key of TOKENVAULT_ENCRYPTION_KEYS sealed the two ciphertexts; null once they are erased.
    key_id text,
    client_id_ciphertext bytea,
    client_secret_ciphertext bytea,
    -- `iat` of the identity JWT that delivered the stored credentials, so a delayed, older callback can
    -- never roll them back. Null when the JWT had no `iat`.
    identity_issued_at timestamptz,
    -- Bumped whenever the credentials change, so any token minted from older credentials is recognisably stale.
    credentials_version bigint not null default 1,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    constraint installation_app_account_key unique (app_id, account_id),
    constraint installation_status_check check (status in ('active', 'uninstalled', 'revoked', 'rejected')),
    -- Credentials exist exactly when the installation can still mint (active or rejected by upstream).
    constraint installation_credentials_check check (
        (status in ('active', 'rejected') and key_id is not null
            and client_id_ciphertext is not null and client_secret_ciphertext is not null)
        or (status in ('uninstalled', 'revoked') and key_id is null
            and client_id_ciphertext is null and client_secret_ciphertext is null)
    )
);

-- Token requests that omit app_id look installations up by account alone.
create index installation_account_idx on installation (account_id);
