-- Service keys are granted apps as well as accounts and scopes: with several apps installed on one
-- account, a key meant for one app must not get another app's tokens. '*' grants every app, which is what
-- keys created before this column keep.
alter table api_client add column apps text[] not null default '{*}';
