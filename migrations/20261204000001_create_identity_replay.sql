-- One identity JWT delivers one message. Every verified `Trackunit-Identity` token is remembered here until
-- it expires (plus leeway), so every replica knows it: the same token with the same body is a retry and is
-- answered as before; with any other body it is refused. Written in the callback's own transaction, so a
-- callback that was not committed is not remembered either.
create table identity_replay (
    -- SHA-256 of `jti:<jti>` when the token has a jti (every token comes from Trackunit's one JWKS), else of
    -- `jwt:<compact token>`.
    token_sha256 bytea primary key,
    -- SHA-256 of the exact body bytes the token first delivered.
    body_sha256 bytea not null,
    first_seen_at timestamptz not null default now(),
    -- The token's exp plus leeway: after this it cannot verify any more, and the row may go.
    expires_at timestamptz not null,
    constraint identity_replay_token_sha256_length check (octet_length(token_sha256) = 32),
    constraint identity_replay_body_sha256_length check (octet_length(body_sha256) = 32)
);

-- The purger deletes expired rows.
create index identity_replay_expires_at_idx on identity_replay (expires_at);
