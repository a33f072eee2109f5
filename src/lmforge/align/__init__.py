"""Alignment: preference data (prefs), one prompt with several replies in a row (pairs), the losses, reward models
(`lmforge rm`), DPO and its family (`lmforge dpo`) and best-of-n sampling scored by a reward model."""
