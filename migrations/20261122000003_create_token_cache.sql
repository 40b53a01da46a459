-- Access tokens minted upstream, shared by every replica so that one mint serves the whole cluster for the
-- token's lifetime. Sealed like credentials; the associated data binds a token to its installation,
-- credentials version and scope set.
create table token_cache (
    installation_id uuid not null,
    -- The requested scopes, sorted, de-duplicated and space-joined: the cache key within an installation.
    scope_key text not null,
    credentials_version bigint not null,
    key_id text not null,
    access_token_ciphertext bytea not null,
    token_type text not null,
    -- The scope the upstream granted, as it answered (may differ from scope_key).
    granted_scope text not null,
    issued_at timestamptz not null,
    expires_at timestamptz not null,
    constraint token_cache_pkey primary key (installation_id, scope_key),
    constraint token_cache_installation_fkey foreign key (installation_id)
        references installation (id) on delete cascade
);
