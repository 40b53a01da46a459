-- Audit trail of every verified callback: what arrived and what we did with it. Never holds a credential.
create table callback_event (
    id bigint generated always as identity primary key,
    received_at timestamptz not null default now(),
    event_type text not null,
    app_id text,
    account_id text,
    -- stored, stale, uninstalled, unknown_installation, ignored
    outcome text not null,
    identity_issued_at timestamptz
);
