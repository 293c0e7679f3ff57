-- Every row of Tollgate belongs to a workspace (DESIGN.md §1).
CREATE TABLE workspaces (
    id   INTEGER PRIMARY KEY,
    name TEXT NOT NULL CHECK (length(name) > 0)
);
