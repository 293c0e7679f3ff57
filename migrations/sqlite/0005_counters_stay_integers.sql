-- SQLite turns an integer sum past 2^63 into a REAL instead of failing, and a
-- REAL in a counter broke every later read of the books. A counter change that
-- leaves the integers is refused instead, as PostgreSQL's BIGINT refuses it:
-- the write that caused it fails alone and the books stay readable.
CREATE TRIGGER counters_stay_integers BEFORE UPDATE ON counters
WHEN typeof(NEW.spent_nanos) <> 'integer' OR typeof(NEW.reserved_nanos) <> 'integer'
BEGIN SELECT RAISE(ABORT, 'a counter would leave the range of whole nano-euros'); END;
