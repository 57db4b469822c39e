"""Transactions rendered for people and pipes: JSON Lines and the pretty terminal view.

Rule: pure functions of transactions; values mean what the one type registry
(``pgoutput.values``) says they mean.
"""
