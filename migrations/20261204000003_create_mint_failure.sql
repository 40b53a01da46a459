-- The last failed mint of a key (installation and scope set), shared by every replica: a replica that
-- waited for the advisory lock behind a failing mint reads the failure here and answers with it, instead
-- of calling the token endpoint again. Deleted by the next successful mint of the key.
create table mint_failure (
    installation_id uuid not null,
    scope_key text not null,
    -- Consecutive failures; the backoff doubles with each.
    failures integer not null,
    -- No upstream call for this key before this time.
    retry_at timestamptz not null,
    -- What the failure was, to answer waiters with the same error: unavailable, failed, rejected or
    -- invalid_scope.
    kind text not null,
    -- For `rejected`: the HTTP status and the OAuth2 error code (never the error description).
    http_status integer,
    error_code text,
    -- For `failed`: how many attempts the failing mint made.
    attempts integer,
    updated_at timestamptz not null default now(),
    constraint mint_failure_pkey primary key (installation_id, scope_key),
    constraint mint_failure_installation_fkey foreign key (installation_id)
        references installation (id) on delete cascade,
    constraint mint_failure_kind_check check (kind in ('unavailable', 'failed', 'rejected', 'invalid_scope'))
);
