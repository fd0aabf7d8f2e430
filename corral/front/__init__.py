"""The front: the asynchronous HTTP/1.1 server that clients talk to."""
