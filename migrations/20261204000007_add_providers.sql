-- Providers as configuration. An installation is now one account's credentials at one provider: for
-- Trackunit, what an IrisX install delivered (one per app and account, as before); for any other
-- provider, what an operator registered through the admin API (one per account; app_id is null).
-- Existing rows are Trackunit's and keep working unchanged.
alter table installation add column provider text not null default 'trackunit';
alter table installation alter column app_id drop not null;
alter table installation add constraint installation_app_id_check
    check ((provider = 'trackunit') = (app_id is not null));
-- One set of credentials per account at each other provider. Trackunit's stay unique per (app, account)
-- by installation_app_account_key, where a null app_id never conflicts.
create unique index installation_provider_account_key on installation (provider, account_id) where app_id is null;

-- How its tokens are minted: with the client credentials grant, or (user-delegated credentials, registered
-- with a refresh token) with the refresh token grant.
alter table installation add column grant_type text not null default 'client_credentials';
alter table installation add constraint installation_grant_type_check
    check (grant_type in ('client_credentials', 'refresh_token'));

-- A public client registered with a refresh token has no secret: the secret may be null while active.
-- (A relaxation: every existing row satisfies the new constraint.)
alter table installation drop constraint installation_credentials_check;
alter table installation add constraint installation_credentials_check check (
    (status in ('active', 'rejected') and key_id is not null and client_id_ciphertext is not null)
    or (status in ('uninstalled', 'revoked') and key_id is null
        and client_id_ciphertext is null and client_secret_ciphertext is null)
);

-- The refresh token of user-delegated credentials. Apart from the installation row, so that rotating it
-- (every refresh may return a new one) does not notify every replica to drop its cached tokens. Spent at
-- most once: a mint locks this row (`for update`) for the whole refresh and stores the rotated token in
-- the same transaction as the access token.
create table refresh_token (
    installation_id uuid primary key,
    key_id text not null,
    ciphertext bytea not null,
    aad_version smallint not null default 2,
    -- Bumped at each rotation, and part of the associated data: a spent token written back does not open.
    generation bigint not null default 1,
    -- When the provider said it expires; null when it did not say.
    expires_at timestamptz,
    updated_at timestamptz not null default now(),
    constraint refresh_token_installation_fkey foreign key (installation_id)
        references installation (id) on delete cascade
);

-- A refresh token that came with a client-credentials token (Keycloak's "use refresh tokens for client
-- credentials"): kept with the access token it came with, sealed like it, and spent by the next renewal of
-- the same key while valid.
alter table token_cache add column refresh_token_ciphertext bytea;
alter table token_cache add column refresh_expires_at timestamptz;

-- Service keys are granted providers as well. Keys created before keep exactly their access: Trackunit.
alter table api_client add column providers text[] not null default '{trackunit}';
