-- When each ledger row's request was admitted (DESIGN.md R1, R7): the instant
-- that chose the cycle it is booked to. A request admitted before a boundary and
-- settled after it is booked to the cycle of its admission; when the plan's start
-- or timezone moves the current cycle's bounds, the books are rebuilt from the
-- rows admitted within the new bounds (`admitted_at`, else `occurred_at` for usage
-- recorded without a hold and for rows from before this column), so such a
-- request is never counted in two cycles. The holds keep it from admission on.
ALTER TABLE usage_events ADD COLUMN admitted_at TEXT;  -- RFC 3339, UTC
ALTER TABLE lapsed_reservations ADD COLUMN created_at TEXT;  -- RFC 3339, UTC
