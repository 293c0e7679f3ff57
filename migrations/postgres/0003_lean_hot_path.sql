-- Fewer index writes per admission and settlement. There are only ever as many
-- reservations as requests in flight: the sweep for expired leases scans those
-- few rows instead of keeping an index that every admission and every
-- settlement would write.
DROP INDEX reservations_lease;
