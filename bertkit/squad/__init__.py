"""SQuAD: its files (dataset), questions to windows of tokens (windows), windows to
answers (answers)."""
