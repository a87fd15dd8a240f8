"""Presentation: markdown for job summaries and PR comments, and the step summaries built from results."""
