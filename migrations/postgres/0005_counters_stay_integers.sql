-- The same schema version as SQLite's 0005: PostgreSQL's BIGINT counters already
-- refuse a sum past 2^63 ("bigint out of range"), so nothing changes here.
SELECT 1;
