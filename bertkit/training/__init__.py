"""Training: the loop (trainer), its state files and resume (states), the end of a run
(ending), the optimizer and schedule, logs and progress, and one or many processes
(distributed)."""
