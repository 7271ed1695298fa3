"""Examples of a bot written against the gateway (not part of the product packages)."""
