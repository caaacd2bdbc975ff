"""One decode step, engine-independent: the controller (index, draft, plan, commit), the router
with its step cost model, and the named fault points the failure tests use."""
