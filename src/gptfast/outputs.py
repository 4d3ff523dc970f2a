"""The names a training run writes into its out-dir, declared once: the writers use them, and data preparation
and loading never read them as text."""

CHECKPOINT_FILE = "ckpt.pt"
LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"
RUN_OUTPUTS = (CHECKPOINT_FILE, LOG_FILE, PLOT_FILE, TENSORBOARD_DIR)
