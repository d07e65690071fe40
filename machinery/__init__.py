"""The machinery of train_grpo.py and train_sft.py, which a reader of the algorithm may skip.

Nothing of GRPO is here: which samples train, the loss and its divisor are in train_grpo.update().
What is here, one module per concern (the scripts name the module at each call):

    cli.py          what every script shares (eval.py too): Refused and the one-line error
                    (`<script>: error: ...`, exit 2), a stdout that survives its reader
    options.py      which options are the recipe and which say how to run; every check before loading
    run_folder.py   the run folder: lock, args.json, metrics.jsonl, atomic checkpoints, --resume
    run.py          the Run: setup before any weight loads, then checkpoints and metrics around the loop
    memory.py       what a GPU holds, micro-batch sizes and packing, the out-of-memory retry
    update.py       the bookkeeping of train_grpo.update(): its micro-batches and its metrics
    distributed.py  data parallel (torchrun): ranks, the metrics' all-reduce
    script.py       the trainers' entry point: Ctrl-C, SIGTERM and SIGHUP keep every finished step
                    (exit 130), warnings made errors

A step is finished once its metrics line is written.

    python train_grpo.py --help          # the options; machinery has no command of its own
    python -m pytest tests/test_train_grpo.py
"""
