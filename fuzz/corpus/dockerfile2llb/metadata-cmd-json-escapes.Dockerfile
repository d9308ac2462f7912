FROM busybox
CMD ["echo", "a\"b", "tab\tx"]
