FROM busybox
ADD --chmod=644 --chown=7:8 {{HTTP}}/data.txt /x
