"""``python -m nas.latency COMMAND``: the agent imports nothing but the standard library, numpy and its runtime
(a small board has no Hydra, Optuna or PyTorch); the other commands are Hydra apps."""

import sys

if __name__ == "__main__":
    if sys.argv[1:2] == ["agent"]:
        from nas.latency.agent import main

        sys.exit(main(sys.argv[2:]))
    from nas.latency.commands import run

    run()
