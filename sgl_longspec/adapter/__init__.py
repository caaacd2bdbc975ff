"""Everything that touches SGLang: the plugin entry point, the LONGSPEC algorithm's registration
and worker, the --longspec-* flags, the corpus endpoints, request checks, TP sync, metrics, and
`sglang_compat`, the one door through which SGLang's names come in (checked against the pinned
version)."""
