"""Plan a merge from headers, then stream it tensor by tensor into an output folder."""
