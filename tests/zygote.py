"""A warm interpreter for the tests' command lines (``helpers.run_cli``).

Most of a test command's time is the interpreter importing torch, transformers, peft and Hydra
(about 5 s of CPU on a 2-core CI machine, for a run that then trains for a fraction of a
second). This process imports them once; for each command it forks a child that sets the
command's working directory, environment, argv and standard streams and runs the script or
module as ``python`` would (``runpy``, as ``__main__``), then exits with its exit code. Nothing
is shared with the tests' own process, and the child is a process of its own (signals, file
size limits and exit codes are real); what it skips is the import of modules already loaded.

Protocol, one JSON object a line: the client writes ``{"argv", "cwd", "env", "out", "err"}``;
this process answers ``{"pid"}`` once the child runs and ``{"code"}`` once it has exited. It
imports no module that a command runs with ``-m`` (``runpy`` would warn that it was loaded
before it ran) and starts no thread before forking.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading

#: Imported once here: what ``run.py``, the analysis and the lm-eval bridge import first.
PRELOAD = (
    "torch",
    "transformers",
    "peft",
    "hydra",
    "hydra.core.hydra_config",
    "hydra._internal.core_plugins.basic_sweeper",
    "omegaconf",
    "pandas",
    "pyarrow.parquet",
    "scipy.stats",
    "matplotlib.pyplot",
    "stablelora.config.check",
    "stablelora.config.hydra_guards",
    "stablelora.runner.job",
    "stablelora.runner.sweep",
    "stablelora.models",
    "stablelora.tasks",
)


def preload() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    # transformers' lazy modules: the model classes, config and tokenizer registries
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401


def run_child(request: dict) -> None:
    """In the forked child: become the command, run it, exit with its code (never returns)."""
    import atexit
    import runpy
    import traceback

    code = 1
    try:
        os.setsid()  # its own process group: a timeout kills what it started too
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        os.dup2(os.open(request["out"], flags, 0o600), 1)
        os.dup2(os.open(request["err"], flags, 0o600), 2)
        argv = request["argv"]
        try:
            if argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]
                sys.path[0] = os.getcwd()
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            elif argv[0] == "-c":
                sys.argv = ["-c", *argv[2:]]
                sys.path[0] = ""
                exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
            else:
                sys.argv = list(argv)
                sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
                runpy.run_path(argv[0], run_name="__main__")
            code = 0
        except SystemExit as stop:
            if stop.code is None or isinstance(stop.code, int):
                code = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - as the interpreter: the traceback, exit code 1
            traceback.print_exc()
            code = 1
        threading._shutdown()  # type: ignore[attr-defined]  # as at exit: join its threads
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def serve() -> None:
    channel_in = sys.stdin
    channel_out = os.fdopen(os.dup(1), "w")
    for line in channel_in:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            channel_out.close()
            run_child(request)
        channel_out.write(json.dumps({"pid": pid}) + "\n")
        channel_out.flush()
        _, status = os.waitpid(pid, 0)
        channel_out.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
        channel_out.flush()


if __name__ == "__main__":
    preload()
    if threading.active_count() != 1:  # a thread would not survive the fork: refuse
        print(json.dumps({"error": f"{threading.active_count()} threads after preload"}))
        sys.exit(1)
    print(json.dumps({"ready": os.getpid()}), flush=True)
    serve()
