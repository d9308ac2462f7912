FROM busybox
SHELL ["/bin/sh", "-c", "echo shell-prefix > /shell.txt; $0"]
RUN true
