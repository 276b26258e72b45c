"""`specdec bench`: speed measured side by side, through the real services, in one run."""
