"""Data: record types, chat formatting and tokenisation, input pipelines."""
