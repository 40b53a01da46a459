-- Every replica caches service keys and installations in memory so the token path needs no query.
-- These triggers tell all replicas (LISTEN tokenvault_change) which entry to drop whenever a row changes,
-- whoever changed it: tokenvault itself, its CLI, or an operator with psql.

create function notify_api_client_change() returns trigger language plpgsql as $$
begin
    perform pg_notify('tokenvault_change', 'api_client:' || encode(coalesce(new.key_sha256, old.key_sha256), 'hex'));
    if tg_op = 'UPDATE' and new.key_sha256 <> old.key_sha256 then
        perform pg_notify('tokenvault_change', 'api_client:' || encode(old.key_sha256, 'hex'));
    end if;
    return null;
end
$$;

create trigger api_client_notify_change
    after insert or update or delete on api_client
    for each row execute function notify_api_client_change();

-- Payload `installation:<id>:<account_id>`: the id is a fixed-length uuid, so the account id may hold ':'.
create function notify_installation_change() returns trigger language plpgsql as $$
begin
    perform pg_notify('tokenvault_change',
        'installation:' || coalesce(new.id, old.id)::text || ':' || coalesce(new.account_id, old.account_id));
    return null;
end
$$;

create trigger installation_notify_change
    after insert or update or delete on installation
    for each row execute function notify_installation_change();
