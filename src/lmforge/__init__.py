"""lmforge: from corpus to chat. See docs/ARCHITECTURE.md for the stages and how data flows between them."""

__version__ = "0.1.0"
