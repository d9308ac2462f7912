FROM scratch
ADD --checksum={{COMMIT1}} {{GIT}}/repo.git#main /r
