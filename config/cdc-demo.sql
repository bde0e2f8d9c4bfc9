-- The quickstart's PostgreSQL source for `chgate cdc` (applied by scripts/dev-stack to the
-- database `demo`; idempotent).
CREATE TABLE IF NOT EXISTS public.customers (
    id bigint PRIMARY KEY,
    name text,
    email text,
    updated_at timestamptz
);
CREATE TABLE IF NOT EXISTS public.orders (
    id bigint PRIMARY KEY,
    customer_id bigint,
    status text,
    amount numeric(12,2),
    note text,
    updated_at timestamptz
);
