"""Evaluation: validation loss on a token split (`val_loss`), HellaSwag completion scoring
(`hellaswag`), and the runner behind run_eval.py (`runner`). The trainer and run_eval.py call the
same functions; each splits its items over the ranks of a process group and reduces the results."""
