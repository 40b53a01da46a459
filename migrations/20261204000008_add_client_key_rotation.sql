-- Service keys managed through the admin API: keys may expire, a rotation keeps the previous key valid
-- for a grace period so callers can roll over, and a revoked client's name can be used again.
alter table api_client add column expires_at timestamptz;
-- Set once the expiry of the key has been written to the audit trail.
alter table api_client add column expiry_audited boolean not null default false;
alter table api_client add column previous_key_sha256 bytea;
alter table api_client add column previous_key_expires_at timestamptz;
alter table api_client add constraint api_client_previous_key_sha256_length
    check (previous_key_sha256 is null or octet_length(previous_key_sha256) = 32);
-- A name is unique among clients that are not revoked (it was unique among all clients).
alter table api_client drop constraint api_client_name_key;
create unique index api_client_active_name_key on api_client (name) where revoked_at is null;
-- The previous key of a rotation is looked up by its digest too.
create index api_client_previous_key_sha256_idx on api_client (previous_key_sha256)
    where previous_key_sha256 is not null;

-- When each client's key was last used, to within a minute. Apart from api_client so that writing it
-- notifies no replica (the api_client trigger drops cached clients), and written off the request path.
create table api_client_usage (
    client_id uuid primary key,
    last_used_at timestamptz not null,
    constraint api_client_usage_client_fkey foreign key (client_id) references api_client (id) on delete cascade
);

-- The change trigger also names the previous key's digest, so every replica drops it from its caches.
create or replace function notify_api_client_change() returns trigger language plpgsql as $$
begin
    perform pg_notify('tokenvault_change', 'api_client:' || encode(coalesce(new.key_sha256, old.key_sha256), 'hex'));
    if tg_op = 'UPDATE' and new.key_sha256 <> old.key_sha256 then
        perform pg_notify('tokenvault_change', 'api_client:' || encode(old.key_sha256, 'hex'));
    end if;
    if tg_op <> 'INSERT' and old.previous_key_sha256 is not null then
        perform pg_notify('tokenvault_change', 'api_client:' || encode(old.previous_key_sha256, 'hex'));
    end if;
    return null;
end
$$;
