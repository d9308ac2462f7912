FROM busybox
WORKDIR /a
WORKDIR b
WORKDIR c
RUN pwd > /pwd
