"""What runs around the loop, knowing nothing of data or models: the process group and the DeepSpeed
config (distributed.py), checkpoints and export (checkpoint.py, with files.py's atomic writes), resuming
(resume.py), reporting (report.py), the watchdog (health.py), preemption (preempt.py: a signalled job
saves the step reached and exits 75), fault injection (faults.py) and the start-up checks of the world
(preflight.py)."""
