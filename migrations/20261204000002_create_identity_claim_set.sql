-- The sets of claim names (never values) that verified identity JWTs carried. Trackunit documents no
-- claims; this shows operators which ones they could require (TOKENVAULT_TRACKUNIT_REQUIRED_CLAIMS).
create table identity_claim_set (
    -- The claim names, sorted and comma-joined.
    names text primary key,
    first_seen_at timestamptz not null default now(),
    -- Kept to within a minute: each replica writes a set it keeps seeing at most once a minute.
    last_seen_at timestamptz not null default now()
);
