FROM scratch
COPY a.txt /right
