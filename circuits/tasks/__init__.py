"""Tasks: the `Task` record and metrics (`task`), task files (`files`, `mib`), built-in
tasks (`builtin`)."""
