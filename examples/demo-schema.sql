-- Demo schema for docker-compose: a table and a publication the bridge tails.
CREATE TABLE IF NOT EXISTS accounts (
    id      bigint PRIMARY KEY,
    owner   text NOT NULL,
    balance numeric(12, 2) NOT NULL DEFAULT 0
);
CREATE PUBLICATION demo_pub FOR TABLE accounts;
