"""Serving: a trained run exported to a self-contained folder, and `Retriever` over it.

`format` (the export layout and its checks, shared by writer and reader), `export` (the writer),
`retriever.Retriever` (the reader and search), `__main__` (the command line).
"""
