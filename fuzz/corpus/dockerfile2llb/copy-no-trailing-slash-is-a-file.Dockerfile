FROM scratch
COPY a.txt /dst
