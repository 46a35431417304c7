"""Data: tokenizers and chat templates (HelpSteer2 pipelines join here)."""
