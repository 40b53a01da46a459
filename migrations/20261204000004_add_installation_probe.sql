-- A rejected installation (the token endpoint answered invalid_client) is probed again with one upstream
-- call on a schedule (by default 1 min after the rejection, then 10 min and 1 h after each probe, then
-- every 6 h), and becomes active on success: an
-- incident that refuses every client, or credentials not yet propagated, must not strand an account.
alter table installation
    add column rejected_at timestamptz,
    -- Probes made since the rejection.
    add column probe_count integer not null default 0,
    -- When the next probe is due; null unless rejected.
    add column next_probe_at timestamptz,
    -- The scope set of the mint that was refused: the probe asks for the same.
    add column probe_scope_key text;

-- The prober looks for due probes.
create index installation_next_probe_at_idx on installation (next_probe_at) where status = 'rejected';
