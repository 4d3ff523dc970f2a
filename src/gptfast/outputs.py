"""The names a training run writes into its out-dir, declared once: the writers use them, and data preparation
and loading never read them as text."""

CHECKPOINT_FILE = "ckpt.pt"
SHARDED_CHECKPOINT_DIR = "ckpt"  # --parallel fsdp's checkpoint: a link to the folder of its latest save
SHARDED_MARKER = ".metadata"  # the file torch.distributed.checkpoint writes last into a sharded checkpoint
LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"
RUN_OUTPUTS = (CHECKPOINT_FILE, SHARDED_CHECKPOINT_DIR, LOG_FILE, PLOT_FILE, TENSORBOARD_DIR)
