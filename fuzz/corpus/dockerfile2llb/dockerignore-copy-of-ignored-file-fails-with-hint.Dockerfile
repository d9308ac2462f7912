FROM scratch
COPY secret.txt /
