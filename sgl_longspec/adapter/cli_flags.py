"""The `--longspec-*` flags on SGLang's own command line, through two HookRegistry hooks
(`register_cli_hooks`): after `ServerArgs.add_cli_args` they are added to SGLang's parser (so
`python -m sglang.launch_server --help` lists them and a typo is an argparse error), and after
`ServerArgs.from_cli_args` the given ones are validated and handed to the scheduler processes in
the environment variable LONGSPEC_CONFIG (JSON; the launcher's environment is inherited by the
processes it spawns). LONGSPEC_CONFIG set by hand is the base that flags override, which is also
the route for `sglang.Engine(...)` users. The window check against
--speculative-num-draft-tokens runs in the algorithm's server-args hook, once that is resolved.
"""

from __future__ import annotations

import sys
from dataclasses import fields

from sgl_longspec.config import LongSpecConfig


def _after_add_cli_args(result, parser, *args, **kwargs):
    LongSpecConfig.add_cli_args(parser)


def _after_from_cli_args(server_args, cls, ns, *args, **kwargs):
    given = any(hasattr(ns, "longspec_" + f.name) for f in fields(LongSpecConfig))
    if given:
        try:
            cfg = LongSpecConfig.from_cli(ns, LongSpecConfig.from_env())
            cfg.validate()  # ranges now; the window once SGLang has resolved it
        except ValueError as e:  # argparse's convention: usage error, exit status 2
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        cfg.to_env()
    return None  # the ServerArgs unchanged


def register_cli_hooks() -> None:
    from sgl_longspec.adapter import sglang_compat

    sglang_compat.hook(sglang_compat.ADD_CLI_ARGS, _after_add_cli_args, "AFTER")
    sglang_compat.hook(sglang_compat.FROM_CLI_ARGS, _after_from_cli_args, "AFTER")
