-- One audit trail for everything that changes who can get what: callbacks, uninstalls, revokes, rejections
-- and reactivations, credentials registered or deleted, service keys created, rotated, revoked or expired,
-- encryption-key rotations. The callback audit table becomes it (renamed), with who did it, to what, and
-- in which request. Never a secret. A view keeps the old name readable for existing queries.
alter table callback_event rename to audit_event;
alter table audit_event rename column received_at to at;
alter table audit_event rename column event_type to action;
-- callback, cli, prober, or client:<name> (the admin key's client).
alter table audit_event add column actor text not null default 'callback';
alter table audit_event add column provider text;
alter table audit_event add column installation_id uuid;
alter table audit_event add column client_name text;
alter table audit_event add column request_id text;

-- GET /v1/audit pages newest first and filters by account, provider, action and time.
create index audit_event_at_idx on audit_event (at desc, id desc);
create index audit_event_account_idx on audit_event (account_id, id desc);

create view callback_event as
    select id, at as received_at, action as event_type, app_id, account_id, outcome, identity_issued_at
    from audit_event;
