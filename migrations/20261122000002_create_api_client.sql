-- Internal services that may ask for tokens. Only the SHA-256 of each service key is stored: a database
-- dump does not let anyone call the token API.
create table api_client (
    id uuid primary key default gen_random_uuid(),
    name text not null,
    key_sha256 bytea not null,
    -- Account ids this client may get tokens for; '*' grants every account.
    accounts text[] not null,
    -- Scopes this client may ask for; '*' grants every scope.
    scopes text[] not null,
    admin boolean not null default false,
    created_at timestamptz not null default now(),
    revoked_at timestamptz,
    constraint api_client_name_key unique (name),
    constraint api_client_key_sha256_key unique (key_sha256),
    constraint api_client_key_sha256_length check (octet_length(key_sha256) = 32)
);
