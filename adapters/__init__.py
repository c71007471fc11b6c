"""tenantlora adapters: the registry (tenants, keys, adapter versions), the content-addressed
adapter store, and validation of uploaded PEFT adapters. No HTTP and no vLLM in here."""
