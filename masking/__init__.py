"""Mask kinds as SQL expressions, with Python twins for redacting audit logs.

Empty until the policy engine lands: the proxy relays every statement as sent.
"""
