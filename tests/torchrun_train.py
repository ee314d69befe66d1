"""Test-only entry point for torchrun: `python -m torch.distributed.run ... tests/torchrun_train.py --config F ...`.

Parses the same flags as `leanlm train` and runs `cmd_train`, i.e. what `torchrun -m leanlm train` does.
"""

import argparse
import sys

from leanlm.train import add_train_parser

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    add_train_parser(ap.add_subparsers(dest="verb"))
    args = ap.parse_args(["train", *sys.argv[1:]])
    args.fn(args)
