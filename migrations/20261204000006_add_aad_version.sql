-- The associated data that binds each ciphertext to its row, by version. 1: credentials bound to app,
-- account and field; cached tokens to installation, credentials version and scope set. 2 also binds
-- credentials to the installation id and credentials version, and cached tokens to their type, granted
-- scope and expiry, so a row cannot be rolled back to older credentials or a token's life extended by
-- editing the table. New values are sealed as 2; `tokenvault keys rotate` re-seals rows still at 1.
alter table installation add column aad_version smallint not null default 1;
alter table token_cache add column aad_version smallint not null default 1;
